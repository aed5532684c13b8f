"""The dependency graph: channel axes (dims), per-op rules, coupled channel groups."""
from vitprune.deps.dims import AxisTable
from vitprune.deps.graph import DependencyGraph, UnsupportedOp
from vitprune.deps.groups import ChannelGroup, GroupMember

__all__ = ["AxisTable", "ChannelGroup", "DependencyGraph", "GroupMember", "UnsupportedOp"]
