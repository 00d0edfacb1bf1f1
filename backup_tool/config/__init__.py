"""Where things are and what the user asked for: the policy file and the runtime settings
(repository URL, DSN, keys) resolved from flags and the environment."""
