"""Accounts: users with one role each (officer, engineer, device, admin) and hashed API tokens."""
