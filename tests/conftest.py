import os

from hypothesis import settings

settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# packed layers measure their kernel crossover once per shape and cache it: never in the user's home from tests
os.environ["FPEWIDEN_CACHE"] = __import__("tempfile").mkdtemp(prefix="fpewiden-cache-")
