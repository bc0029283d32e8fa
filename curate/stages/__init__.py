"""Pipeline stages. Each is `run(config, reporter, force) -> manifest`: it checks its inputs against the manifests
that wrote them, prepares its output folder through `base.begin`, and writes its own `_manifest.json` last."""
