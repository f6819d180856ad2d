#!/usr/bin/env bash
# CI step: dmi_ext installed the ways a user installs it, each checked from outside the checkout.
#   1. a wheel built with `pip wheel --no-build-isolation`: it pins the torch it was built with,
#      names its licence, ships py.typed, and its library stays under 3 MB; installed into a fresh
#      virtual environment with that torch, it imports from another folder and runs a forward and
#      backward against the reference;
#   2. that wheel beside another torch (the CUDA venv of the compile check, when it exists): the
#      ImportError names both torches and the rebuild command;
#   3. `pip install .` with build isolation: fails within a minute and says --no-build-isolation;
#   4. a clean clone with no build: `import dmi_ext` compiles the library itself through
#      torch.utils.cpp_extension.load, then runs forward and backward.
# Uses the project's .venv (scripts/env.sh) for the torch to build against. Exits non-zero on any
# failure. Work goes to build/package-check/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. scripts/env.sh
work=$root/build/package-check
rm -rf "$work"
mkdir -p "$work"
torch_version=$(python -c "import torch; print(torch.__version__.split('+')[0])")
export PIP_DISABLE_PIP_VERSION_CHECK=1
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }

# A forward and backward of the installed op against the reference, run from outside the checkout.
cat > "$work/use.py" <<'PY'
import os, sys
import torch
import dmi_ext
assert not dmi_ext.__file__.startswith(sys.argv[1]), f"imported from the checkout: {dmi_ext.__file__}"
torch.manual_seed(0)
x = torch.randn(256, 10, dtype=torch.float64, requires_grad=True)
y = torch.randint(0, 10, (256,))
loss = dmi_ext.dmi_loss(x, y)
loss.backward()
xr = x.detach().clone().requires_grad_(True)
ref = dmi_ext.reference.dmi_loss(xr, y)
ref.backward()
torch.testing.assert_close(loss, ref)
torch.testing.assert_close(x.grad, xr.grad)
print(f"[package-check] {os.path.basename(os.path.dirname(dmi_ext.__file__))} from "
      f"{os.path.dirname(dmi_ext.__file__)}: loss {loss.item():.6f} = reference; gradient = reference")
PY

echo "== 1. wheel"
start=$SECONDS
python -m pip wheel -q --no-build-isolation --no-deps -w "$work/dist" . 2> >(quiet >&2)
wheel=$(ls "$work"/dist/dmi_ext-*.whl)
echo "[package-check] built $(basename "$wheel") in $((SECONDS - start)) s"
python - "$wheel" "$torch_version" <<'PY'
import sys, zipfile
wheel, torch_version = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
    meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    libs = [i for i in z.infolist() if i.filename.startswith("dmi_ext/_C") and i.filename.endswith(".so")]
requires = [l.split(":", 1)[1].strip() for l in meta.splitlines() if l.startswith("Requires-Dist:")]
pin = f"torch=={torch_version}"
assert pin in requires, f"the wheel does not pin {pin}: Requires-Dist {requires}"
assert "BSD-3-Clause" in meta, "no licence in the wheel's metadata"
assert any(n.endswith("LICENSE") for n in names), "no LICENSE file in the wheel"
assert "dmi_ext/py.typed" in names, "no py.typed in the wheel"
assert len(libs) == 1, f"expected one dmi_ext/_C*.so, found {[i.filename for i in libs]}"
size = libs[0].file_size / 2**20
assert size < 3, f"dmi_ext/_C is {size:.2f} MB (limit 3 MB)"
print(f"[package-check] wheel: Requires-Dist {', '.join(requires)}; licence BSD-3-Clause; "
      f"py.typed; {libs[0].filename} {size:.2f} MB")
PY
venv=$work/venv
python -m venv "$venv"
"$venv/bin/python" -m pip install -q "torch==$torch_version" numpy 2> >(quiet >&2)
"$venv/bin/python" -m pip install -q --no-deps "$wheel" 2> >(quiet >&2)
(cd "$work" && "$venv/bin/python" use.py "$root/dmi_ext")

echo "== 2. the wheel beside another torch"
other=${DMI_EXT_CUDA_VENV:-$root/.venv-cuda}/bin/python
if [ -x "$other" ] && [ "$("$other" -c 'import torch; print(torch.__version__.split("+")[0])')" != "$torch_version" ]; then
  "$other" -m pip install -q --no-deps --target "$work/other" "$wheel" 2> >(quiet >&2)
  if (cd "$work" && PYTHONPATH="$work/other" "$other" -c "import dmi_ext" 2> "$work/other.err"); then
    echo "[package-check] FAILED: the wheel imported into another torch" >&2; exit 1
  fi
  other_version=$("$other" -c "import torch; print(torch.__version__)")
  for want in "ImportError: dmi_ext: its compiled library could not be loaded" \
              "built against torch $(python -c 'import torch; print(torch.__version__)')" \
              "this environment has torch $other_version" "pip install --no-build-isolation"; do
    grep -qF "$want" "$work/other.err" || { echo "[package-check] FAILED: message lacks '$want':" >&2; cat "$work/other.err" >&2; exit 1; }
  done
  echo "[package-check] beside torch $other_version: $(grep -m1 ImportError "$work/other.err" | cut -c1-120)..."
else
  echo "[package-check] no second torch here (the CUDA venv): step 2 skipped"
fi

echo "== 3. pip install . with build isolation"
iso=$work/iso-venv
python -m venv "$iso"
start=$SECONDS
if "$iso/bin/python" -m pip install . > "$work/isolation.log" 2>&1; then
  echo "[package-check] FAILED: expected build isolation to stop with a message" >&2; exit 1
fi
took=$((SECONDS - start))
grep -q "pip install --no-build-isolation" "$work/isolation.log" \
  || { echo "[package-check] FAILED: no --no-build-isolation advice:" >&2; cat "$work/isolation.log" >&2; exit 1; }
[ "$took" -lt 60 ] || { echo "[package-check] FAILED: took $took s (limit 60)" >&2; exit 1; }
echo "[package-check] build isolation stopped in $took s with the --no-build-isolation advice"

echo "== 4. JIT build of a clean checkout"
# In the fresh venv, with the wheel removed again and ninja (which cpp_extension.load needs) added:
# nothing there knows of this checkout's build.
"$venv/bin/python" -m pip uninstall -q -y dmi_ext
"$venv/bin/python" -m pip install -q ninja 2> >(quiet >&2)
git clone -q "$root" "$work/clone"
start=$SECONDS
(cd "$work/clone" && TORCH_EXTENSIONS_DIR="$work/jit-cache" "$venv/bin/python" - <<'PY'
import dmi_ext
name = dmi_ext._ops._C.__name__
assert name.startswith("dmi_ext_C_"), name
print(f"[package-check] JIT: dmi_ext._C is {name}, built by torch.utils.cpp_extension.load")
PY
)
(cd "$work" && PYTHONPATH="$work/clone" TORCH_EXTENSIONS_DIR="$work/jit-cache" "$venv/bin/python" use.py "$root/dmi_ext")
echo "[package-check] JIT build and run in $((SECONDS - start)) s"
echo "== package check passed"
