"""Accuracy and speed evaluations of the appliance's detector and tracker, each beside a peer.

Run through the justfile (``just eval-detect``, ``just eval-track``, ``just bench-detector``) in
``.venv-bench``, which also holds the peer tools (Ultralytics, pycocotools, trackeval). Nothing
here is imported by the running appliance.
"""
