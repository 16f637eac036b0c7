#!/usr/bin/env bash
# What this project runs on a lent GPU, phase by phase (each fits one 10-minute call):
#   bash benchmarks/gpu_session.sh pretrain|speed1|speed8|sdxl|flow
# Wheels the GPU image lacks (diffusers, bitsandbytes) travel in .whl/ (see docs/benchmarks.md).
# Results land in $OUT (default ./gpu-out): one log and one table per phase.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
python3 -c "import torch, diffusers, transformers, peft, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
case "$1" in
  pretrain)  # the toy world's UNet + text encoder, on the shipped VAE
    python3 -m conceptor.toyworld.pretrain "$OUT/model" --vae-from conceptor/toyworld/vae --device cuda \
      --images 40000 --unet-steps ${STEPS:-16000} --unet-batch 128 --unet-lr 5e-4 --warmup-steps 500 \
      --save-every 4000 --deadline-min ${DEADLINE:-7} --log "$OUT/pretrain.log"
    tail -3 "$OUT/pretrain.log"
    tar -C "$OUT" -czf "$OUT/model.tgz" model && rm -rf "$OUT/model"
    ;;
  speed1)
    python3 benchmarks/gpu_smoke.py 2>"$OUT/smoke.err" | tee "$OUT/smoke.md"
    python3 benchmarks/speed.py --size sd15 --batch-size 1 --mixed-precision bf16 --steps 20 --warmup 5 \
      --variants ti,ref-ti,db-full,db-prior,ref-db-prior,db-8bit-ckpt,lora,ft 2>"$OUT/speed1.err" | tee "$OUT/sd15-b1.md"
    ;;
  speed8)
    python3 benchmarks/speed.py --size sd15 --batch-size 8 --mixed-precision bf16 --steps 10 --warmup 3 \
      --variants ti,ref-ti,ft,lora,ti-compile,ft-compile 2>"$OUT/speed8.err" | tee "$OUT/sd15-b8.md"
    ;;
  sdxl)
    python3 benchmarks/speed.py --size sdxl --batch-size 1 --mixed-precision bf16 --steps 10 --warmup 3 \
      --variants ti,lora,db-8bit-ckpt 2>"$OUT/sdxl.err" | tee "$OUT/sdxl-b1.md"
    ;;
  flow)  # issue 20: Flux.1-dev and SD3.5-medium LoRA at 1024 px (targets: Flux <= 24 GB bf16, <= 16 GB nf4;
         # SD3.5-medium <= 12 GB), with the preflight estimate beside the measured peak
    python3 benchmarks/speed.py --size flux-dev --batch-size 1 --mixed-precision bf16 --steps 10 --warmup 3 \
      --variants flow-lora,flow-lora-nf4 2>"$OUT/flux.err" | tee "$OUT/flux-b1.md"
    python3 benchmarks/speed.py --size sd3.5-medium --batch-size 1 --mixed-precision bf16 --steps 10 --warmup 3 \
      --variants flow-lora 2>"$OUT/sd35.err" | tee "$OUT/sd35-b1.md"
    ;;
esac
