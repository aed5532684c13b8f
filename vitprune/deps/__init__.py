"""The dependency graph: channel axes (dims), per-op rules, coupled channel groups."""
from .dims import AxisTable
from .graph import DependencyGraph, UnsupportedOp
from .groups import ChannelGroup, GroupMember

__all__ = ["AxisTable", "ChannelGroup", "DependencyGraph", "GroupMember", "UnsupportedOp"]
