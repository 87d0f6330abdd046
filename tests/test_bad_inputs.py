"""Bad input as a user would type it: each gives one or two lines naming the input, exit status 2 (bad input) or 1
(a failure during the run), never a traceback; nothing is created or loaded before the inputs are checked."""

from __future__ import annotations

import errno
import io
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from defect_data import make_flat
from PIL import Image

from dualanodiff_core import cli
from dualanodiff_core.errors import DualAnoDiffError
from dualanodiff_core.minidefect.tiny import save_tiny_model, tiny_components
from dualanodiff_core.sd15.pipeline import DualAnoDiffPipeline


class Evil:
    """Unpickling this would create a file (code execution); the loaders must refuse it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _weights(path: Path, base_model: str, **unet_kwargs) -> Path:
    c = tiny_components(0, **unet_kwargs)
    pipe = DualAnoDiffPipeline(c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"], rank=4)
    pipe.to_weights({"base_model": base_model}).save(path)
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    model = save_tiny_model(root / "model")
    return {
        "root": root,
        "model": model,
        "weights": _weights(root / "w.safetensors", str(model)),
        "other": _weights(root / "other.safetensors", "models/other-sd15", block_out_channels=(64, 64)),
    }


def _model_copy(assets, tmp_path: Path, edit_unet_config=None) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(assets["model"], dst)
    if edit_unet_config is not None:
        p = dst / "unet" / "config.json"
        cfg = json.loads(p.read_text())
        edit_unet_config(cfg)
        p.write_text(json.dumps(cfg))
    return dst


def _huge_png(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims w x h pixels (only the header is ever read)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:20] = w.to_bytes(4, "big")
    data[20:24] = h.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def _run(capsys, argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error" in ln or ln.startswith("(")]
    assert len(lines) <= 2, err
    return code, err


def _gen(assets, out, *extra, weights=None, base=None):
    return [
        "generate",
        "--weights",
        weights or assets["weights"],
        "--base",
        base or assets["model"],
        "--out",
        out,
        "--n",
        "1",
        "--size",
        "16",
        "--steps",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


# ---- generate ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, names",
    [
        (["--lora-strength", "nan", "1"], "--lora-strength"),
        (["--saim-strength", "inf"], "--saim-strength"),
        (["--cfg", "nan"], "--cfg"),
        (["--prompt-anomaly", ""], "--prompt-anomaly"),
        (["--prompt-global", "  "], "--prompt-global"),
        (["--size", "abc"], "--size"),
        (["--steps", "many"], "--steps"),
        (["--lora-strenght", "1", "1"], "--lora-strenght"),  # a typo
    ],
)
def test_generate_refuses_bad_options_in_two_lines(assets, tmp_path, capsys, extra, names):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in _gen(assets, out, *extra)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and names in err and len(err.strip().splitlines()) <= 2, err
    assert not out.exists()


def test_generate_refuses_sizes_beyond_the_maximum_unless_raised(assets, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, _gen(assets, out, "--size", "100000"))
    assert code == 2 and "--size 100000x100000" in err and "--max-size" in err and not out.exists()
    code, err = _run(capsys, _gen(assets, out, "--size", "4096", "--max-size", "1024"))
    assert code == 2 and "1024" in err and not out.exists()


def test_generate_weights_problems_are_named_before_the_model_loads(assets, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, _gen(assets, out, weights=tmp_path / "nope.safetensors"))
    assert code == 2 and "--weights" in err and "nope.safetensors" in err
    # random bytes under a .bin name
    junk = tmp_path / "junk.bin"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    code, err = _run(capsys, _gen(assets, out, weights=junk))
    assert code == 2 and "junk.bin" in err and "not a PyTorch weights file" in err
    # a pickle that would run code: refused, and never the advice to switch the safety off
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    torch.save({"unet.x": Evil(marker)}, evil)
    code, err = _run(capsys, _gen(assets, out, weights=evil))
    assert code == 2 and "evil.bin" in err and "refused" in err
    assert "weights_only" not in err and not marker.exists()
    # a truncated safetensors file
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(assets["weights"].read_bytes()[:1000])
    code, err = _run(capsys, _gen(assets, out, weights=cut))
    assert code == 2 and "cut.safetensors" in err
    # weights trained on another base model: both files and the recorded base model named
    code, err = _run(capsys, _gen(assets, out, weights=assets["other"]))
    assert code == 2 and "other.safetensors" in err and str(assets["model"]) in err
    assert "models/other-sd15" in err and "unet." not in err.split("do not fit")[0][-5:]
    assert not out.exists()  # nothing created for a run that cannot start


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: c.update(in_channels=9), ["in_channels=9", "inpainting", "expected 4"]),
        (
            lambda c: c.update(addition_embed_type="text_time", cross_attention_dim=2048),
            ["Stable Diffusion XL", "cross_attention_dim=2048"],
        ),
        (lambda c: c.update(out_channels=8), ["out_channels=8"]),
    ],
)
def test_base_models_that_are_not_sd1_are_named_with_what_was_found(assets, tmp_path, capsys, edit, words):
    base = _model_copy(assets, tmp_path, edit)
    out = tmp_path / "out"
    code, err = _run(capsys, _gen(assets, out, base=base))
    assert code == 2 and str(base) in err and "not a Stable Diffusion 1.x model" in err, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()
    # the same check in train, before any model is loaded
    data = make_flat(tmp_path / "data", n=2, size=16)
    code, err = _run(capsys, ["train", data, "--model", base, "-o", tmp_path / "o.safetensors", "--resolution", "16"])
    assert code == 2 and "not a Stable Diffusion 1.x model" in err
    assert not (tmp_path / "o_train").exists()


def test_damaged_base_model_files_are_named(assets, tmp_path, capsys):
    base = _model_copy(assets, tmp_path)
    (base / "unet" / "config.json").write_text("{not json")
    code, err = _run(capsys, _gen(assets, tmp_path / "o1", base=base))
    assert code == 2 and str(base / "unet" / "config.json") in err and "JSON" in err
    shutil.copy(assets["model"] / "unet" / "config.json", base / "unet" / "config.json")
    st = base / "unet" / "diffusion_pytorch_model.safetensors"
    st.write_bytes(st.read_bytes()[:2000])  # truncated
    code, err = _run(capsys, _gen(assets, tmp_path / "o2", base=base))
    assert code == 2 and str(base / "unet") in err and "copy the model folder again" in err, err
    assert not (tmp_path / "o2").exists()
    # a pickled .bin in place of the safetensors: refused without running it
    st.unlink()
    marker = tmp_path / "pwned"
    torch.save({"conv_in.weight": Evil(marker)}, base / "unet" / "diffusion_pytorch_model.bin")
    code, err = _run(capsys, _gen(assets, tmp_path / "o3", base=base))
    assert code == 2 and str(base / "unet") in err and "pickled" in err and not marker.exists(), err
    assert "weights_only=False" not in err


def test_output_folder_problems_are_found_before_loading(assets, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    code, err = _run(capsys, _gen(assets, a_file / "sub"))
    assert code == 2 and "--out" in err and "file.txt" in err
    code, err = _run(capsys, _gen(assets, a_file))
    assert code == 2 and "file.txt" in err


def test_huge_images_get_a_clear_message(assets, tmp_path, capsys):
    bg = tmp_path / "good"
    _huge_png(bg / "a.png", 20000, 20000)  # beyond PIL's decompression-bomb guard
    weights = tmp_path / "w_bcm.safetensors"
    c = tiny_components(0)
    DualAnoDiffPipeline(
        c["unet"], c["vae"], c["text_encoder"], c["tokenizer"], c["scheduler_config"], rank=4, bcm=True
    ).to_weights().save(weights)
    code, err = _run(capsys, _gen(assets, tmp_path / "out", "--backgrounds", bg, weights=weights))
    assert code == 2 and "a.png" in err and "downscale" in err
    (bg / "a.png").unlink()
    _huge_png(bg / "b.png", 10000, 10000)  # under PIL's guard, over ours
    code, err = _run(capsys, _gen(assets, tmp_path / "out", "--backgrounds", bg, weights=weights))
    assert code == 2 and "b.png" in err and "10000x10000" in err
    # the same for a training image
    data = make_flat(tmp_path / "data", n=2, size=16)
    _huge_png(data / "images" / "000.png", 20000, 20000)
    code, err = _run(capsys, ["train", data, "--model", "m", "-o", tmp_path / "o.safetensors", "--dry-run"])
    assert code == 2 and "000.png" in err and "downscale" in err


def test_a_full_disk_during_the_run_is_a_run_failure(assets, tmp_path, capsys, monkeypatch):
    from dualanodiff_core.dataset import export

    def full(self, sample):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.out / "x.png"))

    monkeypatch.setattr(export.DatasetWriter, "write", full)
    code, err = _run(capsys, _gen(assets, tmp_path / "out"))
    assert code == 1 and "no space left" in err and "run the same command again" in err


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(assets, tmp_path, capsys, monkeypatch):
    from dualanodiff_core.dataset import generate

    def boom(*a, **k):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(generate, "generate_dataset", boom)
    code, err = _run(capsys, _gen(assets, tmp_path / "out"))
    assert code == 1 and "unexpected RuntimeError: something broke" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="something broke"):
        cli.main(["--debug", *[str(a) for a in _gen(assets, tmp_path / "out")]])
    with pytest.raises(DualAnoDiffError, match="--object-masks"):  # --debug after the command works too
        cli.main([*[str(a) for a in _gen(assets, tmp_path / "out")], "--object-masks", str(tmp_path), "--debug"])


# ---- train ---------------------------------------------------------------------------------------------------------
def _train(data, out, *extra):
    return ["train", data, "--model", "m", "-o", out, "--resolution", "16", "--dry-run", *extra]


def test_train_explains_masks_it_refuses(tmp_path, capsys):
    data = make_flat(tmp_path / "d", n=2, size=16)
    m = np.asarray(Image.open(data / "masks" / "000.png"))
    Image.fromarray((m > 0).astype(np.uint8)).save(data / "masks" / "000.png")  # a 0/1 mask
    code, err = _run(capsys, _train(data, tmp_path / "o.safetensors"))
    assert code == 2 and "000.png" in err and "only 0 and 1" in err and "255" in err
    red = np.zeros((*m.shape, 3), np.uint8)
    red[..., 0] = m
    Image.fromarray(red).save(data / "masks" / "000.png")  # red on black
    code, err = _run(capsys, _train(data, tmp_path / "o.safetensors"))
    assert code == 2 and "000.png" in err and "colored" in err


def test_train_warns_about_tiny_images(tmp_path, capsys):
    data = make_flat(tmp_path / "d", n=2, size=16)
    Image.new("RGB", (1, 1), (200, 0, 0)).save(data / "images" / "001.png")
    Image.new("L", (1, 1), 255).save(data / "masks" / "001.png")
    code = cli.main([str(a) for a in _train(data, tmp_path / "o.safetensors", "--resolution", "64")])
    err = capsys.readouterr().err
    assert code == 0 and "001.png" in err and "only 1x1 px" in err


def test_train_output_problems_are_found_before_loading(tmp_path, capsys, assets):
    data = make_flat(tmp_path / "d", n=2, size=16)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    argv = ["train", data, "--model", assets["model"], "-o", a_file / "w.safetensors", "--resolution", "16"]
    code, err = _run(capsys, argv)
    assert code == 2 and "--output" in err and "file.txt" in err
    argv = ["train", data, "--model", assets["model"], "-o", tmp_path / "w.safetensors", "--work-dir", a_file]
    code, err = _run(capsys, argv + ["--resolution", "16"])
    assert code == 2 and "--work-dir" in err and "file.txt" in err


def test_train_refuses_a_resolution_beyond_the_maximum(tmp_path, capsys):
    data = make_flat(tmp_path / "d", n=2, size=16)
    code, err = _run(
        capsys, ["train", data, "--model", "m", "-o", tmp_path / "o.safetensors", "--resolution", "100000"]
    )
    assert code == 2 and "--resolution 100000" in err and "--max-size" in err
