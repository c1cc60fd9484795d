#!/bin/sh
# Job vilbert-minio-setup: creates the buckets and the application account, with access to those buckets only.
# Idempotent, so it is safe on every `kubectl apply`. Needs: MINIO_URL, MINIO_ROOT_USER, MINIO_ROOT_PASSWORD,
# VILBERT_BUCKETS (space-separated), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (the application account) and
# MC_CONFIG_DIR on a writable volume (the root filesystem is read-only).
set -eu

attempt=0
until mc alias set vilbert "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null 2>&1; do
  attempt=$((attempt + 1))
  if [ "$attempt" -ge 60 ]; then
    echo "MinIO at $MINIO_URL did not answer after $attempt attempts" >&2
    exit 1
  fi
  echo "waiting for MinIO at $MINIO_URL ($attempt)"
  sleep 5
done

resources=""
for bucket in $VILBERT_BUCKETS; do
  mc mb --ignore-existing "vilbert/$bucket"
  resources="$resources\"arn:aws:s3:::$bucket\",\"arn:aws:s3:::$bucket/*\","
done
resources="${resources%,}"

policy_file="$MC_CONFIG_DIR/vilbert-app-policy.json"
cat > "$policy_file" <<POLICY
{"Version": "2012-10-17",
 "Statement": [{"Effect": "Allow", "Action": ["s3:*"], "Resource": [$resources]}]}
POLICY
# `policy create` replaces an existing policy of that name, so a changed bucket list takes effect.
mc admin policy create vilbert vilbert-app "$policy_file"
# `user add` sets the secret key of an existing user, so a changed Secret takes effect.
mc admin user add vilbert "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY"
if ! mc admin user info vilbert "$AWS_ACCESS_KEY_ID" --json | grep -q '"vilbert-app"'; then
  mc admin policy attach vilbert vilbert-app --user "$AWS_ACCESS_KEY_ID"
fi
echo "buckets: $VILBERT_BUCKETS; account $AWS_ACCESS_KEY_ID has policy vilbert-app"
