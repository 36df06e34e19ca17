"""Data: from URL + caption lists to the batches training and evaluation read.

``download`` turns a list into webdataset shards (img2dataset) with a data report and a shard
manifest; ``loader`` streams the shards as augmented images plus tokenised captions (the reference's
augmentation, skip-and-count error handling, DDP-aware sharding); ``demo_data`` draws the demo's
procedural scenes, whose captions state exactly what is drawn, so evaluation can check them.
"""
