"""scoopy's engine. The life of a message:

1. `Cooperation.launch` (or a step's `scope.launch`) inserts the message and, fanning out
   on write, one `run` row per saga subscribed to its topic (`store`, `sql/launch.sql`).
2. A NOTIFY on the schema's channel, or the poll, wakes the claimer of that saga in every
   worker serving it (`worker.Worker`: one anyio task group per process).
3. The claimer locks one ready run, `FOR UPDATE SKIP LOCKED`, in a transaction it hands to
   an executor (`runner.Runner.claim`, `sql/claim.sql`).
4. In that transaction the state machine (`machine`, pure) says what the run does next, and
   `step.StepTransaction` does it: the user's step, compensation or handler, then the
   messages it launched (new child runs, counted in the run's `pending`).
5. One statement writes the run's new state and its events (`eventlog`) and, when the run
   finished, takes one from its parent's `pending`; the last child makes the parent ready.
6. The commit, often sent with the BEGIN of the next claim (`handover`), makes all of it
   visible at once; what it made ready is woken (`records.AfterCommit`, `instrument` logs it).
7. When a hierarchy's root runs have finished, its waiters learn the `Outcome` (`waiting`).
"""
