"""The store scan: feature pages read in place (`pages`), the exact float16/float32 screen
(`screen`, its fused kernel `native` + `screen16.c`) and the per-task top-k scan of feature
files (`scanner`)."""
