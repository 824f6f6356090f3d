"""core/backends"""
