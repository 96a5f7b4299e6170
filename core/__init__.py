"""The bottom layer every Kano package may import, and which imports no other Kano package: `KanoError`
(errors.py), terminal tables and progress (ui.py), the method table (registry.py), atomic writes and manifests
(files.py), device choice (device.py), the ranking curve and F1 threshold (curves.py), process groups
(distributed.py)."""
