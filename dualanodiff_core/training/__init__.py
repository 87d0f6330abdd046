"""Backbone-independent training: the trainer (:mod:`.trainer`), the few-shot data (:mod:`.data`), BCM training
backgrounds (:mod:`.backgrounds`) and the loss plot (:mod:`.lossplot`)."""
