"""Long-context accuracy suite: tasks, scorers, a resumable runner and reports.

Layout: `schema` (samples and result records), `tasks/` (one file per task family),
`scorers`, `prompt` (chat-template rendering), `methods` (the only module touching the core
library), `runner`, `report`, `cli` (`tca eval`).
"""
