"""Training methods (ESD, backdoored textual inversion, …), each on the backend protocol."""
