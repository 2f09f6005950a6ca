#!/usr/bin/env bash
# Packs what the GPU image lacks into .devsite/site.tgz (carried with every device call):
# ../shared/device/build-site.sh (Unsloth 2026.10.9 & co) plus the service's own needs, pinned to the
# versions in this repo's venv; then drops Unsloth's web studio and torchao's tests (size: the tree
# and the carried files must stay under 64 MiB) and adds opentelemetry-api, which fastapi 0.165
# imports (found missing on the first call).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
bash ../shared/device/build-site.sh fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 sqlalchemy==2.1.9 \
  greenlet alembic==1.20.1 mako==1.4.3 pydantic==2.14.4 pydantic_core==2.50.5 pydantic-settings==2.16.3 \
  python-dotenv==1.2.4 python-multipart==0.0.34 annotated-types==0.8.0 typing-inspection==0.4.5 \
  prometheus-client==0.26.0 quicktok-v1==0.4.0 openai-harmony==0.0.8 httpx==0.28.1 annotated-doc \
  opentelemetry-api==1.45.2
work=$(mktemp -d)
tar xzf .devsite/site.tgz -C "$work"
rm -rf "$work/studio" "$work/test"
tar czf .devsite/site.tgz -C "$work" .
rm -rf "$work"
ls -la .devsite/site.tgz
