# Object storage for the pipeline:
#   data        webdataset shards + the DVC remote; versioning on, so an overwritten shard or DVC
#               object can be recovered (noncurrent versions expire after a grace period)
#   artifacts   MLflow artifact store (mlflow server --artifacts-destination s3://<prefix>-artifacts/mlflow)
#   checkpoints train.checkpoint_uri; expired by a lifecycle rule, since multi-GB checkpoints pile up fast
locals {
  buckets = {
    data        = "${var.bucket_prefix}-data"
    artifacts   = "${var.bucket_prefix}-artifacts"
    checkpoints = "${var.bucket_prefix}-checkpoints"
  }
}

resource "aws_s3_bucket" "this" {
  for_each = local.buckets
  bucket   = each.value
}

resource "aws_s3_bucket_public_access_block" "this" {
  for_each                = aws_s3_bucket.this
  bucket                  = each.value.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  for_each = aws_s3_bucket.this
  bucket   = each.value.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_versioning" "data" {
  bucket = aws_s3_bucket.this["data"].id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "data" {
  bucket = aws_s3_bucket.this["data"].id
  # Lifecycle rules on a versioned bucket must be applied after versioning is enabled.
  depends_on = [aws_s3_bucket_versioning.data]

  rule {
    id     = "expire-noncurrent-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.data_noncurrent_retention_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "checkpoints" {
  bucket = aws_s3_bucket.this["checkpoints"].id

  rule {
    id     = "expire-checkpoints"
    status = "Enabled"
    filter {}
    expiration {
      days = var.checkpoint_retention_days
    }
    # A node lost mid-upload leaves multipart parts that are billed but invisible.
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "artifacts" {
  bucket = aws_s3_bucket.this["artifacts"].id

  rule {
    id     = "abort-incomplete-uploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
}
