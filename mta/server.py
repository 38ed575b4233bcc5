"""(the MTA process, next)"""
