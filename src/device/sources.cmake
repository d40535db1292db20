list(APPEND AGORAFS_SOURCES
  ${CMAKE_CURRENT_LIST_DIR}/file_device.cc
  ${CMAKE_CURRENT_LIST_DIR}/mem_device.cc
  ${CMAKE_CURRENT_LIST_DIR}/fault_device.cc
  ${CMAKE_CURRENT_LIST_DIR}/device_guard.cc
  ${CMAKE_CURRENT_LIST_DIR}/nbd_device.cc
  ${CMAKE_CURRENT_LIST_DIR}/recording_device.cc
  ${CMAKE_CURRENT_LIST_DIR}/crash_replay.cc)
