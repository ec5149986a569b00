"""The example service files at the top of the repository, for readers: what `overnight install`
writes for one example run, on each platform.

    systemd/mlx-overnight-example.service     launchd/io.mlx-overnight.example.plist

They are rendered from the packaged templates (supervisor/service/templates/) with `SPEC`;
tests/test_systemd.py and tests/test_launchd.py check that they still are. After changing a
template: `python -m supervisor.service.examples` rewrites them.
"""

from __future__ import annotations

from pathlib import Path

from supervisor.service import launchd, systemd
from supervisor.service.model import Host, ServiceSpec

REPO = Path(__file__).resolve().parents[2]
SPEC = ServiceSpec(
    name="example", python="/usr/bin/python3", config=Path("/home/ada/work/example.yaml"),
    run_dir=Path("/home/ada/work/runs/example"), workdir=Path("/home/ada/work"),
    environment=(("PATH", "/home/ada/venv/bin:/usr/bin:/bin"),
                 ("VIRTUAL_ENV", "/home/ada/venv")),
    stop_timeout=120.0, watchdog_sec=systemd.WATCHDOG_SEC,
)
HOST = Host(home=Path("/home/ada"), uid=1000, user="ada", xdg_config_home=None,
            launchctl="launchctl", systemctl="systemctl", loginctl="loginctl")


def rendered() -> dict[Path, str]:
    """Example file -> the text install would write for SPEC."""
    return {
        REPO / "systemd" / systemd.unit_name(SPEC.name):
            systemd.Systemd(HOST, lambda argv: None).render_spec(SPEC),
        REPO / "launchd" / f"{launchd.label(SPEC.name)}{launchd.SUFFIX}":
            launchd.Launchd(HOST, lambda argv: None).render_spec(SPEC),
    }


if __name__ == "__main__":
    for path, text in rendered().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
