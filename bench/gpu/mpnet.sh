# The MPNet run on a single-GPU machine. all-mpnet-base-v2's 438 MB model.safetensors
# does not fit one call's 64 MiB transfer, so earlier commands carry it in parts to /root/mp
# (bench/gpu/README.md); this command takes the last part in .mp6, checks the whole file's
# SHA-256, builds the MPNet shadows and backdoored evaluation models, calibrates the
# mpnet-768-l12 preset on the shadows only, installs it and audits. Each step copies its results
# to $OUT, so a command stopped at its limit still returns what it finished.
#   bash bench/gpu/mpnet.sh CLEAN_SEEDS BD_SEEDS
set -u
. bench/gpu/env.sh
CS=${1:-30}; BS=${2:-6}
M=bench/cache/zoo/mpnet
mkdir -p "$M"
cp -r /root/mp/small/. "$M/"
(cd .mp6 && sha256sum -c SHA256SUMS) || exit 3
cat /root/mp/part0[0-5] .mp6/part06 > "$M/model.safetensors"
sha256sum -c bench/gpu/mpnet.sha256 || exit 3
save() {
  cp bench/results/zoo_calibration_rows.jsonl bench/results/zoo_presets.json \
     bench/results/zoo_detect.jsonl "$OUT/" 2>/dev/null
  cp auditor/data/presets.json "$OUT/package_presets.json"
  tar cf "$OUT/built_models_info.tar" bench/cache/zoo/mpnet-*/FINETUNE.json \
     bench/cache/zoo/mpnet-*/backdoor.json 2>/dev/null
}
Z="python3 bench/zoo.py --device cuda --threads 8"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$Z build mpnet-ft-topic-s100 mpnet-ft-topic-s100-por mpnet-por-2pv; save
$Z calibrate --seeds 4 --bd-seeds 2 --family-seeds "mpnet-768-l12=$CS,$BS"; save
python3 bench/install_presets.py | grep mpnet; save
$Z detect mpnet-por-2pv; save
$Z detect mpnet; save
$Z build mpnet-btop-2pv && $Z detect mpnet-btop-2pv; save
echo ALL DONE
