"""`tca leaderboard`: methods side by side at matched kept fractions.

Layout: `matching` (each method's sweep point nearest a target fraction, the best method and its
margin; pure), `timings` (prefill times read from a `tca bench methods` JSON), `report`
(leaderboard.json, leaderboard.md, the PNG plots), `cli` (the command; the runs themselves are
`tca eval`'s resumable run folders).
"""
