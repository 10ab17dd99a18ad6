"""TotalSegmentator's published nnU-Net weights as a backend (see `backend.py`), the one-time
converter of its release zips (`convert.py`), and nnU-Net's inference path (`nnunet.py`)."""
