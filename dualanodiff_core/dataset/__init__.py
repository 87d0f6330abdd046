"""Making a defect dataset: the generation loop (:mod:`.generate`), mask extraction (:mod:`.masks`), the
accept/reject filter (:mod:`.acceptance`) and the MVTec-layout writer (:mod:`.export`)."""
