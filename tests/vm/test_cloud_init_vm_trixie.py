"""test_cloud_init_vm.py's tests on Debian 13 (trixie: cloud-init 25, systemd 257, Python 3.13,
whose venv has no setuptools), in a file of its own so that `make test`'s two workers (one file
each at a time) boot the two releases' VMs side by side."""

from __future__ import annotations

from test_cloud_init_vm import (  # noqa: F401 - collected here again, on trixie
    booted,
    test_agent_converged_once,
    test_cloud_init_done_without_errors,
    test_config_is_root_only,
    test_first_boot_apt_housekeeping,
    test_no_password_in_any_log,
    test_reboot_serves_again_without_a_second_run,
    test_twine_pip_uv,
    test_user_data_is_valid_and_small,
    test_wrong_password_is_refused,
)

SUITES = ("trixie",)
VARIANT = "first-boot"
