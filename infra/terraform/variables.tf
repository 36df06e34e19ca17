variable "region" {
  description = "AWS region of the buckets (put them in the GPU cluster's region: shards are read at GPU speed)."
  type        = string
  default     = "us-east-1"
}

variable "bucket_prefix" {
  description = "Bucket names are <prefix>-data, <prefix>-artifacts, <prefix>-checkpoints (S3 names are global: pick your own)."
  type        = string
  default     = "galip"
}

variable "checkpoint_retention_days" {
  description = "Training checkpoints are scratch: promoted models live in the MLflow artifact store. Must exceed the longest pause of a run you may still resume."
  type        = number
  default     = 30
}

variable "data_noncurrent_retention_days" {
  description = "How long overwritten or deleted data objects (shards, DVC cache) stay recoverable."
  type        = number
  default     = 90
}
