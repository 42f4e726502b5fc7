# aopd on GPUs: CUDA PyTorch + vLLM (the `gpu` extra). Build: docker build -t aopd .
# Run:   docker run --gpus all -v $PWD:/work -w /work aopd pipeline experiment=paper_4b_3k
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/aopd
ENV PATH=/opt/aopd/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /opt/aopd/src
COPY pyproject.toml README.md ./
COPY aopd_cli ./aopd_cli
COPY recipes ./recipes
COPY experiments ./experiments
RUN pip install --no-cache-dir --upgrade pip && pip install --no-cache-dir -e ".[gpu]"
ENTRYPOINT ["aopd"]
CMD ["--help"]
