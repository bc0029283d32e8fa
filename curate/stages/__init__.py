"""Pipeline stages. Each reads files, writes files, and ends by writing its `_manifest.json`."""
