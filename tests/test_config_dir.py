"""`--config DIR`: every *.yaml in a directory (projected ConfigMaps) is served together."""

from __future__ import annotations

import asyncio
from pathlib import Path

from extproc.server import DataPlane, ServerOptions

DOC = """\
apiVersion: holysheep.ai/v1
kind: HolySheepConfig
metadata: {{name: {name}, namespace: holysheep-system}}
spec:
  providers: [{{name: {name}, baseUrl: "https://{name}.example.com/v1", auth: {{env: X_{name}}}}}]
"""


def test_directory_of_configmaps_is_loaded_and_reloaded(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(DOC.format(name="alpha"))
    (tmp_path / "b.yaml").write_text(DOC.format(name="beta"))
    (tmp_path / "..data").mkdir()  # kubelet's bookkeeping entries are not configs
    (tmp_path / "notes.txt").write_text("not yaml")
    plane = DataPlane(ServerOptions(config_path=str(tmp_path), secrets_dir=str(tmp_path / "none")))

    async def scenario() -> None:
        assert await plane.reload()
        assert plane.runtime is not None and sorted(plane.runtime.providers) == ["alpha", "beta"]
        (tmp_path / "b.yaml").write_text("spec: [not, a, config]")
        assert not await plane.reload()  # rejected: the last good config stays
        assert sorted(plane.runtime.providers) == ["alpha", "beta"]
        await plane.upstream.close()

    asyncio.run(scenario())
