"""Layer 6: environments.  Profiles and generations (:mod:`.profiles`), ``pure shell`` and
``pure run`` (:mod:`.shell`), the store namespace of a rooted store (:mod:`.namespace`)."""
