"""The synthetic demo world: ``world`` makes it (deterministic webcams, snapshots, raters and
rendered skies), ``seed`` writes it into the app's tables (`airatings demo seed`), and
``run`` is `airatings demo run` (what `just demo` runs): seed, then `airatings release`."""
