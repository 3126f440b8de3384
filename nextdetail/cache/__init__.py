"""What a storage root holds, asked without running anything: which stages are up to date (`status`, `current`),
artifacts by stage with sizes and references (`inventory`: cache ls/du/gc), copies to and from a team bucket
(`transfer`: push/pull/verify), adopting artifacts built by other code (`accept`), and evaluated runs side by side
(`compare`). Outside every stage's code identity."""
