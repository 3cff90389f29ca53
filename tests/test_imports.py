import subprocess
import sys


def test_core_imports_only_torch_and_numpy():
    code = (
        "import sys, fewbits\n"
        "heavy = {'onnx', 'onnxruntime', 'transformers', 'matplotlib', 'scipy', 'sklearn', 'safetensors'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
