"""The MTA and MSA: SMTP in, the durable spool, the queue runner, delivery out."""
