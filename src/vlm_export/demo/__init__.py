"""The easy-vqa demo: a small VLM assembled from SmolLM2-135M-Instruct and a trained vision tower."""

#: the demo serves up to 8 requests in one batch: issue #14's in-flight batching target is measured
#: at concurrency 8 (the decoder's TensorRT profiles then take batch 1..8, the image path 8 x max_images)
DEMO_MAX_BATCH = 8
