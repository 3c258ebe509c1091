"""The tensor operations the merge methods share: SVD and orthogonal bases (``linalg``), low-rank deltas and their
products (``lowrank``), and the chunked elementwise steps (``elementwise``: top-k trimming, sign election, DARE)."""
