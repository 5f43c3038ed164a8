"""lm-evaluation-harness for diffusion LMs: the ``diffexit`` model (:mod:`.lm`), the shipped offline tasks
(``tasks/``) and the ``diffexit eval`` command (:mod:`.command`)."""
