import sys
from pathlib import Path

# tests/helpers.py is imported as a plain module by the end-to-end tests.
sys.path.insert(0, str(Path(__file__).resolve().parent))
