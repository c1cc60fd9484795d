"""Validation suites (Great Expectations, defined in code), quarantine and reports for the validate step.

One module per table or area: :mod:`.manifest`, :mod:`.captions`, :mod:`.taskfiles` (COCO instances),
:mod:`.vqa`, :mod:`.refcoco`, :mod:`.flickr30k`, :mod:`.vcr`, :mod:`.features`; :mod:`.engine` runs them
with GX, :mod:`.quarantine` and :mod:`.reports` write the results. The step itself is
:func:`components.steps.validate.run_validate`.
"""

from components.validation.limits import ValidationLimits
from components.validation.quarantine import QUARANTINE_FILE, rejected_row_ids

__all__ = ["QUARANTINE_FILE", "ValidationLimits", "rejected_row_ids"]
