import os
import sys

# tests/ holds shared helpers (tolerances.py, models.py); make them importable as modules.
sys.path.insert(0, os.path.dirname(__file__))
