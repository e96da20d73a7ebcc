"""Lab exercise tests: the project and labs/common.py on the path. LABS_IMPL=student runs the
tests against the students' stubs (student.py) instead of the reference answers (reference.py)."""
import sys
from pathlib import Path

LABS = Path(__file__).resolve().parent
for path in (LABS.parent, LABS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
