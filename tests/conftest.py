import os

from hypothesis import settings

settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# packed layers measure their kernel crossover once per shape and cache it: never in the user's home from tests
os.environ["FPEWIDEN_CACHE"] = __import__("tempfile").mkdtemp(prefix="fpewiden-cache-")

# the Triton kernels run on CPU tensors under the interpreter, which triton chooses when it is first imported
# (tests/test_triton.py); a machine with a GPU checks them on the device instead (bench/gpu_check.sh)
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
