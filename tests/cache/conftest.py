"""The image helpers live with the nydusd tests; make them importable here."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "nydusd"))
