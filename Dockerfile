# GPU image: vLLM's official CUDA image (same engine version as the `gpu` extra) plus this package; the CPU
# image (Dockerfile.cpu) keeps the same entrypoint, user, port and HEALTHCHECK.
#   docker build -t tuneserve:gpu .
#   docker run --gpus all -p 8000:8000 --shm-size 1g -v $PWD/adapters:/adapters \
#     -v ~/.cache/huggingface:/home/app/.cache/huggingface tuneserve:gpu \
#     --base-model Qwen/Qwen2.5-7B-Instruct --adapters-dir /adapters
FROM vllm/vllm-openai:v0.32.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/home/app/.cache/huggingface \
    SERVE_HOST=0.0.0.0 \
    SERVE_PORT=8000

RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin app

WORKDIR /opt/tuneserve
COPY pyproject.toml README.md ./
COPY finetune ./finetune
COPY serve ./serve
COPY client ./client
COPY vllm_cpu_lora_fix ./vllm_cpu_lora_fix
COPY tuneserve ./tuneserve
# vllm is already in the base image; this adds the package, its remaining dependencies, S3 adapter sources and
# Ray Serve (python -m serve.cluster, a KubeRay RayService).
RUN python3 -m pip install --no-cache-dir "./[s3,cluster]" && mkdir -p /adapters && chown 1000:1000 /adapters

USER 1000:1000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('SERVE_PORT', '8000')}/health\", timeout=4)"]
ENTRYPOINT ["python3", "-m", "serve"]
