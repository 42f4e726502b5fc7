# aopd on GPUs: vLLM 0.33 (the `gpu` extra) and the CUDA 13 torch it pins. The wheels bring their own CUDA
# runtime, cuBLAS and NCCL: the image needs only the host's driver, which must be 580 or newer (CUDA 13); with
# an older one the NVIDIA container toolkit refuses to start the container (NVIDIA_REQUIRE_CUDA below).
#
# Build: docker build -t aopd .
# Run:   docker run --gpus all --ipc=host -v $PWD:/work -w /work aopd pipeline experiment=paper_4b_3k
#        --ipc=host (or --shm-size=16g): NCCL and vLLM share memory through /dev/shm, 64 MB in Docker by default
FROM ubuntu:24.04
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility NVIDIA_REQUIRE_CUDA="cuda>=13.0"
# a C compiler and Python's headers: Triton (vLLM's kernels) compiles a small launcher at first use
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev git build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/aopd
ENV PATH=/opt/aopd/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /opt/aopd/src
COPY pyproject.toml README.md ./
COPY aopd_cli ./aopd_cli
COPY recipes ./recipes
COPY experiments ./experiments
COPY benchmarks ./benchmarks
RUN pip install --no-cache-dir --upgrade pip && pip install --no-cache-dir -e ".[gpu]"
ENTRYPOINT ["aopd"]
CMD ["--help"]
