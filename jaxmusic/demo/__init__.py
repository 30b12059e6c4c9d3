"""The demo: a synthetic labelled music corpus, a tokenizer trained on it, `jaxmusic demo`
(the staged recipe on a tiny MuFun, from scratch) and `jaxmusic smoke` (the install works).

Nothing here is needed to train or run a real model; it exists so that the whole system can
be tried, and tested, without a download.
"""

from jaxmusic.demo.demo import main, run  # noqa: F401
