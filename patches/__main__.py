"""`python -m megatron_longvita.patches [--platform P] [--json]`: the patches in force here
(and, as text, the upstream contracts)."""

from __future__ import annotations

import argparse
import json

from megatron_longvita.patches import PLATFORMS, declared, installed_version
from megatron_longvita.patches.contracts import CONTRACTS
from megatron_longvita.platform.detect import detect_platform


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--platform", choices=PLATFORMS, help="default: detected")
    parser.add_argument("--json", action="store_true", help="one JSON object per patch")
    args = parser.parse_args()
    platform = args.platform or detect_platform()
    patches = declared(platform)
    if not args.json:
        print(f"platform {platform}: {len(patches)} patch(es)")
    for patch in patches:
        version = installed_version(patch.distribution)
        row = {
            "name": patch.name,
            "target": patch.target,
            "reason": patch.reason,
            "verified": f"{patch.distribution}{patch.versions}",
            "installed": str(version) if version else None,
        }
        if args.json:
            print(json.dumps(row))
        else:
            print(
                f"- {row['name']}\n    target:    {row['target']}\n    reason:    {row['reason']}\n"
                f"    verified:  {row['verified']} (installed {row['installed']})"
            )

    if not args.json:
        print(f"{len(CONTRACTS)} upstream contract(s) (private API relied on, checked by setup_platform)")
        for contract in CONTRACTS.values():
            version = installed_version(contract.distribution)
            print(
                f"- {contract.name}\n    relied on: {contract.relied_on_by}\n    targets:   "
                f"{', '.join(contract.targets())}\n    verified:  {contract.distribution}{contract.versions} "
                f"(installed {version})"
            )


if __name__ == "__main__":
    main()
