"""An app whose module raises while it is imported (a bug in the user's code).

`scoopy worker tests.apps.broken_on_import:setup` must report it as a usage error naming the
module, not with a raw traceback. Nothing else imports this module.
"""

from __future__ import annotations

from scoopy import Cooperation

raise RuntimeError("the app's configuration is missing: SHOP_DATABASE is not set")


def setup(coop: Cooperation) -> None:  # never reached
    pass
