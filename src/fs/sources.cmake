list(APPEND AGORAFS_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/super.cc
  ${CMAKE_CURRENT_LIST_DIR}/inode.cc
  ${CMAKE_CURRENT_LIST_DIR}/filesystem.cc
  ${CMAKE_CURRENT_LIST_DIR}/open_table.cc
  ${CMAKE_CURRENT_LIST_DIR}/namespace.cc
  ${CMAKE_CURRENT_LIST_DIR}/data.cc
  ${CMAKE_CURRENT_LIST_DIR}/acl.cc
  ${CMAKE_CURRENT_LIST_DIR}/xattr.cc
  ${CMAKE_CURRENT_LIST_DIR}/xattr_ops.cc
  ${CMAKE_CURRENT_LIST_DIR}/applock.cc
  ${CMAKE_CURRENT_LIST_DIR}/applock_ops.cc)
