output "buckets" {
  description = "Bucket names by role; use them in the galip-s3 Secret's policy, mlflow.yaml and params.yaml (data.shards, train.checkpoint_uri)."
  value       = { for role, b in aws_s3_bucket.this : role => b.bucket }
}
